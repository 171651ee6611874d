"""Everything that knows about Ray clusters and DeepSpeed (imports nothing from model/ or peer_sweeps/).

- runtime: `ray_session` (embedded Ray or join a cluster), `current_node_id`.
- deepspeed_config: ZeRO 0-3 templates in configs/, `deepspeed_config`, `build_engine`.
- train_job: `run_train_job` (one Ray Train TorchTrainer job), `JobResult`, `TrainJobError`.
- checkpointing: worker side: `save_checkpoint`, `load_latest_checkpoint`, `report_metrics`.
- smoke: a reference worker loop (MLP regression) used by tests and benchmarks.

Submodules are imported on demand: `import cluster` alone loads neither Ray nor DeepSpeed.
"""
