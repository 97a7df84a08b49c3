"""Runs composed of several trainers, above :mod:`memento_train.sft` and :mod:`memento_train.rl` so that
neither imports the other: :mod:`.rl_warmup` (an SFT warm-up stage, then RL from its export)."""
