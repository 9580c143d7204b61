"""The one exception type for mistakes a user can fix (bad config, bad data, missing files).

Every CLI prints a `UserError` as one line and exits 2; any other exception is a bug in ibl_jax and keeps its
traceback. Raise `UserError` (or a subclass: `SessionError`, `EvalError`, `ConvertError`) only for input the
user controls, with a message naming the file, session, split, column or config field at fault.
"""

from __future__ import annotations


class UserError(ValueError):  # a ValueError too, so callers that caught ValueError still do
  """Bad input: printed as `error: <message>` with exit status 2, no traceback."""
