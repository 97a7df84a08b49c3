"""What the SFT and RL drivers share around their own loops: packing a step's documents into
micro-batches and dealing them to ranks (:mod:`.micro_batches`), and the run's output directory,
checkpoints, logger and export (:mod:`.run_dir`)."""
