"""RL algorithm and reward layer: the pieces the RL loop composes with the training engines.

- :mod:`.config` — :class:`~.config.RLConfig`, the ``memento-rl`` run's configuration;
- :mod:`.algorithm` — :class:`~.algorithm.AlgorithmConfig` (loss, clipping, KL, entropy, advantage and
  loss normalisation, old-log-prob source, TIS);
- :mod:`.logprobs` — token log-probs and entropy from logits and shifted labels (chunked, fp32,
  a custom backward that never materialises a full fp32 ``[T, V]`` softmax);
- :mod:`.advantages` — group-normalised (GRPO), mean-centred (Dr.GRPO) and batch-normalised advantages;
- :mod:`.losses` — CISPO and PPO-clip token losses, KL estimators, aggregation, and
  :func:`~.losses.make_loss_fn`, the engine ``loss_fn(logits, mb)``; metric reduction;
- :mod:`.mismatch` — train-vs-rollout log-prob mismatch stats and truncated / masked importance weights;
- :mod:`.rewards` — :class:`~.rewards.RewardConfig`, math-verify and synthetic-task rewards, ``reward.fn``
  import paths, and
  :class:`~.rewards.RewardPool` (worker processes with per-item timeouts).

Nothing is imported here on purpose: reward worker processes import :mod:`.rewards` through this
package, and they should not pay for torch.
"""
