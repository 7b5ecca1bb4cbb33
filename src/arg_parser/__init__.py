"""Every parser and argument check of the CLIs, and YAML configs (timm's convention: YAML keys
become the flags' defaults, the command line overrides).

* ``values``: what each flag's value may be (typed rules such as ``positive_int``, ``fraction``,
  ``finite_float(lo, hi)``, ``Choice``), used as argparse ``type=`` and for YAML values alike, and
  the one message format ``<prog>: <where>: must be <requirement>, got <value>``;
* ``common``: the one parser class (``CliParser``: errors are one line, exit code 2, every argument
  recorded, defaults shown once in --help), boolean and command-line-only flags, ``--mean/--std``
  checks, YAML loading;
* ``train``: train.py's flags (``parse_args``, ``build_parser``, ``check_args``, ``namespace_to_dict``
  keep their names: user code written against the original imports them from here);
* ``evaluate``: validate.py, attack_effectiveness.py and validate_robustbench.py, with the aliases
  ``--attack-eps``/``--eps``, ``--attack-norm``/``--threat-model``, ``--num-examples``/``--n-examples``;
* ``analysis``: attack_convergence.py, ``python -m src.plots`` and benchmark.py;
* ``export``: util_scripts/prepare_checkpoint.py.
"""
from src.arg_parser.common import CliParser, bool_flag, check_mean_std, load_yaml_config, norm_name  # noqa: F401
from src.arg_parser.evaluate import (build_effectiveness_parser, build_robustbench_parser,  # noqa: F401
                                     build_validate_parser, check_effectiveness_args, check_robustbench_args,
                                     check_validate_args, parse_effectiveness_args, parse_robustbench_args,
                                     parse_validate_args)
from src.arg_parser.train import build_parser, check_args, config_parser, namespace_to_dict, parse_args  # noqa: F401
