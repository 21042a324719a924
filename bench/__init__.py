"""Benchmarks: `python -m bench.<name>`; each prints a table, then one JSON line last."""
import json


def emit(result: dict, json_out: str | None = None) -> int:
    """Write the result to `json_out` (if given) and print it as the last line of the output."""
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0
