"""The pipeline's stages (the stage table in table.py), each a plain function `run(job, inputs, ctx)`.

They run the same under Ray Train, torchrun, accelerate launch or a test (pipeline.runner launches them);
only the StageContext they receive differs.
"""
