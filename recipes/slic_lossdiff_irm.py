# Copyright 2026 The trl-select authors. Licensed under the Apache License, Version 2.0.
"""
SLiC (the reference-normalised hinge loss) with in-loop LossDiff-IRM selection: the twin of `dpo_lossdiff_irm.py`.

```bash
accelerate launch recipes/slic_lossdiff_irm.py                      # the embedded demo
accelerate launch recipes/slic_lossdiff_irm.py --selection_rule none   # its baseline: SLiC on the full pool
accelerate launch recipes/slic_lossdiff_irm.py --model_name_or_path ... --dataset_name ...   # like TRL's dpo.py
```
"""

from dpo_lossdiff_irm import DEMO_DEFAULTS, configure_logging, main, make_parser

from trl_select import SelectiveSLiCConfig, SelectiveSLiCTrainer


DEMO_DEFAULTS.update(output_dir="outputs/slic-lossdiff-irm-demo", run_name="slic-lossdiff-irm-demo")

if __name__ == "__main__":
    configure_logging()
    script_args, training_args, model_args = make_parser(SelectiveSLiCConfig).parse_args_and_config()
    main(script_args, training_args, model_args, trainer_class=SelectiveSLiCTrainer)
