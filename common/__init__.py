"""llmc.common: what every stage may import (it imports none of them): the compiler-runtime contract (contract.py),
the targets (targets.py) and the type of the errors a user can cause (errors.py)."""
