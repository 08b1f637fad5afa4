"""Publishing models to the Hugging Face Hub (`ml-mamba-push`).

```python
>>> from ml_mamba.publishing import push_to_hub, validate_folder
>>> print(validate_folder("outputs/my-model").summary())                   # offline checks
>>> push_to_hub("outputs/my-model", "me/ml-mamba-digits", dry_run=True)    # what would be uploaded
>>> push_to_hub("outputs/my-model", "me/ml-mamba-digits", private=True)    # create the repo and upload
```
"""

from .push import DEFAULT_EXCLUDE, PlannedFile, PublishError, PushResult, parse_size, push_to_hub, stage_folder
from .validate import ValidationReport, validate_folder

__all__ = ["push_to_hub", "validate_folder", "stage_folder", "PublishError", "PushResult", "PlannedFile",
           "ValidationReport", "DEFAULT_EXCLUDE", "parse_size"]
