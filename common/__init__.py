"""llmc.common: what every stage may import (it imports none of them): the compiler-runtime contract (contract.py)
and the targets (targets.py)."""
