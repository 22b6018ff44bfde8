"""`python -m gannorm_kernels.info`: prints what this install can do."""

import json

from . import info


def main() -> None:
    report = info()
    for key, value in report.items():
        if key == "backends":
            print("backends:")
            for name, where in value.items():
                for device, reason in where.items():
                    print(f"  {name:<10} {device:<5} {'yes' if reason is None else 'no: ' + reason}")
        else:
            print(f"{key}: {json.dumps(value)}")


main()
