"""Stage `configure`: write each try's effective config to configs/<try>.yaml.

Reads params.yaml (all of it is checked first). Writes configs/<try>.yaml for every
entry of `tries`: train's keys overlaid with the try's own, plus the post's
augmentation recipe when the try augments. Each train@<try> stage lists only its
own file as params, so DVC retrains a try only when its effective config changes.

    python -m stages.configure
"""

import yaml

from stages.errors import exits_cleanly
from stages.outputs import atomic_dir
from stages.params import CONFIGS_DIR, load_params, try_config, try_config_file


def write_try_configs(params, out_dir=CONFIGS_DIR):
    with atomic_dir(out_dir) as partial:
        for name in params["tries"]:
            header = f"# try {name}: written by stages/configure.py from params.yaml; edit params.yaml instead\n"
            body = yaml.safe_dump(try_config(params, name), sort_keys=False)
            try_config_file(name, partial).write_text(header + body)
    print(f"wrote {out_dir}: {', '.join(params['tries'])}")


@exits_cleanly
def main():
    write_try_configs(load_params())


if __name__ == "__main__":
    main()
