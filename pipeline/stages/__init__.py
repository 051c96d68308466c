"""The three training stages, each a plain function `run(job, inputs, ctx) -> StageResult`.

They run the same under Ray Train (pipeline.orchestrate), torchrun, accelerate launch or a test;
only the StageContext they receive differs.
"""
