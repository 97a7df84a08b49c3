"""Build the tiny shipped tokenizer (memento_train/assets/tokenizer/), fully offline.

A byte-level BPE (Qwen2-style pre-tokenizer) trained on the shipped sample traces plus generic
English/math text generated here from a fixed seed. Running it twice writes identical files.

    python scripts/build_tokenizer.py            # writes memento_train/assets/tokenizer/
    python scripts/build_tokenizer.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from memento_train.export.compat import add_legacy_keys  # noqa: E402
from memento_train.tokens import (  # noqa: E402
    ASSISTANT,
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    MEMENTO_TOKENS,
    THINK_TOKENS,
    add_memento_tokens,
    special_token_ids,
)

TRACES = ROOT / "memento_train" / "assets" / "sample_traces.jsonl"
DEFAULT_OUT = ROOT / "memento_train" / "assets" / "tokenizer"
ENDOFTEXT = "<|endoftext|>"
VOCAB_SIZE = 2048  # including all special tokens
# Trained vocab = bytes + merges + the three ChatML specials; think + memento tokens come on top.
BASE_VOCAB_SIZE = VOCAB_SIZE - len(THINK_TOKENS) - len(MEMENTO_TOKENS)
# Qwen2's split pattern: digits one by one (good for arithmetic), words keep their leading space.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in (ENDOFTEXT, IM_START, IM_END, *THINK_TOKENS, *MEMENTO_TOKENS)))

_SUBJECTS = [
    "the model",
    "the student",
    "the teacher",
    "a reader",
    "the assistant",
    "the user",
    "the system",
    "each block",
    "the summary",
    "the proof",
    "the solver",
    "we",
    "I",
]
_VERBS = [
    "can start",
    "will begin",
    "should finish",
    "must complete",
    "tries to summarize",
    "writes a brief recap of",
    "gives an overview of",
    "checks",
    "computes",
    "simplifies",
    "proves",
    "explains",
    "is done with",
    "reaches the end of",
    "reviews",
    "solves",
]
_OBJECTS = [
    "the next step",
    "this section",
    "the equation",
    "the first block",
    "the final answer",
    "the triangle",
    "the sum of the series",
    "a short summary",
    "the integral",
    "the remaining cases",
    "the polynomial",
    "the probability",
    "the function",
    "the area of the circle",
    "the number of solutions",
    "the derivative",
]
_CONNECTIVES = [
    "First,",
    "Then",
    "Next,",
    "So",
    "Therefore,",
    "Finally,",
    "Wait,",
    "Now",
    "In summary,",
    "To recap,",
    "Hence",
    "Because of this,",
    "Let me check:",
]
_WORD_BANK = """
about above across act add after again against age ago agree air all allow almost alone along already
also although always among amount and angle animal another answer any appear apply approach area argue
arm around arrive art article ask assume at attack attention author available average away back bad
balance ball bank base basic be bear beat beautiful because become bed before begin behind believe
below best better between beyond big bill bit black block blue board body book both box boy bring
brother build building business but buy by call camera can capital car card care carry case cat catch
cause cell center central century certain chair chance change character charge check child choice
choose church circle city claim class clear close coach code cold collect college color column come
common community company compare complete compute condition consider constant contain continue control
cost could count country couple course court cover create crime cultural cup current customer cut dark
data daughter day dead deal death debate decade decide decimal deep defense define degree describe
design detail determine develop difference different digit direction discover discuss disease divide
do doctor dog door down draw dream drive drop during each early east easy eat economy edge effect
effort eight either element else end energy enjoy enough enter entire environment equal error
especially establish even evening event ever every evidence exact example exist expect experience
expert explain express eye face fact factor fail fall family far fast father fear feel few field
fight figure fill final finally find fine finger finish fire firm first fish five floor fly focus
follow food foot for force foreign forget form formula forward four fraction free friend from front
full fund future game garden gas general generate get girl give glass go goal good government graph
great green ground group grow growth guess gun guy hair half hand hang happen happy hard have he head
health hear heart heat heavy help her here herself high him himself his history hit hold home hope
hospital hot hotel hour house how however huge human hundred husband idea identify if image imagine
impact important improve in include increase indeed indicate individual industry information inside
instead integer interest interval into investment involve issue it item its itself job join just keep
key kid kill kind kitchen know knowledge land language large last late later laugh law lawyer lay lead
leader learn least leave left leg legal length less let letter level lie life light like likely limit
line list listen little live local long look lose loss lot love low machine magazine main maintain
major majority make man manage manager many market marriage material matrix matter maximum may maybe me
mean measure media medical meet meeting member memory mention message method middle might military
million mind minimum minute miss mission model modern moment money month more morning most mother mouth
move movement movie much multiply music must my myself name nation natural nature near nearly
necessary need negative network never new news newspaper next nice night nine no none nor north not
note nothing notice now number occur odd of off offer office officer official often oh oil ok old on
once one only onto open operation opportunity option or order organization other others our out outside
over own owner page pain painting pair paper parent part particular partner party pass past path
patient pattern pay peace people per perform perhaps period person personal phone physical pick
picture piece place plan plant play player point police policy political poor popular population
position positive possible power practice prepare present president pressure pretty prevent price
prime private probably problem process produce product production professional professor program
project property protect prove provide public pull purpose push put quality question quickly quite
radius race radio raise range rate rather ratio reach read ready real reality realize really reason
receive recent recently recognize record red reduce reflect region relate relationship religious remain
remember remove report represent require research resource respond response rest result return reveal
rich right rise risk road rock role room root rule run safe same save say scene school science score
sea season seat second section security see seek seem sell send senior sense sequence series serious
serve service set seven several shake share she shoot short shot should shoulder show side sign
significant similar simple simply since sing single sister sit site situation six size skill skin
small smile so social society soldier some somebody someone something sometimes son song soon sort
sound source south southern space speak special specific speech spend sport spring square staff stage
stand standard star start state statement station stay step still stock stop store story strategy
street strong structure student study stuff style subject success successful such suddenly suffer
suggest sum summer support sure surface system table take talk task tax teach teacher team technology
television tell ten tend term test than thank that the their them themselves then theory there these
they thing think third this those though thought thousand threat three through throughout throw thus
time to today together tonight too top total tough toward town trade traditional training travel
treat treatment tree trial trip trouble true truth try turn two type under understand unit until up
upon us use usually value variable various vector very victim view violence visit voice vote wait
walk wall want war watch water way we weapon wear week weight well west western what whatever when
where whether which while white who whole whom whose why wide wife will win wind window wish with
within without woman wonder word work worker world worry would write writer wrong yard yeah year yes
yet you young your yourself zero
brief recap overview summary summarize summarizes summarized done complete completed completes begin
begins beginning started starts finished finishes ends ended sections steps blocks
""".split()
_ROLES = ["system", "user", "assistant"]
_VARS = "abcnxyzkmr"


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_CONNECTIVES)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _math(rng: random.Random) -> str:
    a, b = rng.randint(1, 999), rng.randint(1, 99)
    x, y = rng.choice(_VARS), rng.choice(_VARS)
    forms = [
        f"{a} + {b} = {a + b}",
        f"{a} \\times {b} = {a * b}",
        f"\\( {x}^2 + {b}{x} - {a} = 0 \\)",
        f"\\frac{{{a}}}{{{b}}} \\approx {a / b:.3f}",
        f"$$ {x} = \\sqrt{{{a}}} $$",
        f"\\( {x} + {y} = {a} \\) and \\( {x} - {y} = {b} \\)",
        f"\\boxed{{{a + b}}}",
        f"{a} - {b} = {a - b}",
    ]
    return rng.choice(forms)


def _babble(rng: random.Random, weights: list[float]) -> str:
    words = rng.choices(_WORD_BANK, weights=weights, k=rng.randint(5, 14))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ".", ",", "?", ":"])


def generic_corpus(seed: int = 20240601, n_docs: int = 4000) -> list[str]:
    """Deterministic generic English/math documents (including ChatML role words)."""
    rng = random.Random(seed)
    # Zipf-like word frequencies (random ranks) so common words merge first, as in real text.
    ranks = list(range(1, len(_WORD_BANK) + 1))
    rng.shuffle(ranks)
    weights = [1.0 / r for r in ranks]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 6)):
            r = rng.random()
            parts.append(_sentence(rng) if r < 0.3 else _babble(rng, weights) if r < 0.7 else _math(rng))
        text = " ".join(parts)
        # Role words as they follow <|im_start|> in ChatML (start of a segment, then a newline),
        # so BPE learns each of them as one token.
        role = _ROLES[len(docs) % 3]
        docs.append(f"{role}\n{text}")
    return docs


def trace_corpus(path: Path = TRACES) -> list[str]:
    """Problem and response texts of the sample traces, split around special-token strings."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for field in ("problem", "response"):
                # Splitting keeps the delimiters' '<', '|', '_' pieces out of the merges.
                docs.extend(p for p in _SPECIAL_RE.split(rec.get(field) or "") if p)
    return docs


def train_base_tokenizer() -> Tokenizer:
    """Train the byte-level BPE with only the three ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(trace_corpus() + generic_corpus(), trainer=trainer)
    return tok


def build_tokenizer(include_memento_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Build the shipped tokenizer, or (``include_memento_tokens=False``) its base variant.

    The base variant lacks ``<think>``, ``</think>`` and the four memento tokens; applying
    :func:`memento_train.tokens.add_memento_tokens` to it reproduces the full tokenizer's ids.
    """
    hf = PreTrainedTokenizerFast(
        tokenizer_object=train_base_tokenizer(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if include_memento_tokens:
        add_memento_tokens(hf)
    # The masking parser finds the assistant section by the single id of the role word.
    for role in ("user", "system", ASSISTANT):
        ids = hf.encode(f"{IM_START}{role}\n", add_special_tokens=False)
        if len(ids) != 3:
            raise RuntimeError(f"role {role!r} is not one token after {IM_START}: {ids}")
    return hf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    tok = build_tokenizer(include_memento_tokens=True)
    special_token_ids(tok)  # raises if anything is not atomic
    if len(tok) != VOCAB_SIZE:  # the corpus ran out of merges (e.g. a changed tokenizers version)
        raise RuntimeError(f"built vocab has {len(tok)} entries, expected {VOCAB_SIZE}")
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(args.out))
    add_legacy_keys(args.out)  # a tokenizer class transformers 4.x (vLLM 0.13) can load too
    print(f"wrote {args.out} (vocab {len(tok)})")
    for name, i in special_token_ids(tok).items():
        print(f"  {name!r}: {i}")


if __name__ == "__main__":
    main()
