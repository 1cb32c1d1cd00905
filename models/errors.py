"""Errors raised by models/ (the node maps them to job failures)::

    ModelError
    ├── PreprocessError   (models.preprocess) a series cannot be turned into a model input
    ├── RegistryError     (models.registry)   no such model/version, or unreadable weights or card
    └── InferenceError    (models.registry)   the model failed on a valid input
"""


class ModelError(Exception):
    """Base of every error raised by models/."""
