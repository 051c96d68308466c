"""The name and version of the export format (model.safetensors + config.json) stages hand over.

It lives in `models` because the registered MLflow model carries only this package: its loader
(pipeline/pyfunc_classifier.py) checks the same constant that pipeline/train/export.py writes.
"""

EXPORT_FORMAT = "spikformer-export/1"
