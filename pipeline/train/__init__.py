"""The training loop and what it is made of: `trainer` (StageTrainer, the loop a training stage runs),
`engine` (the DeepSpeed wrapper: step, NaN guard, metrics, checkpoint, export), `distributed`
(process group, seeding), `optim` (AdamW groups and the cosine schedule), `checkpoint` (DeepSpeed tags
and the `latest` pointer), `export` (the safetensors hand-off between stages), `metrics` and `artifacts`."""
