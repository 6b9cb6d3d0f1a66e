"""The ablation harness behind `ablations/run.py`, one file a step of its data flow:

    schema.py    the run config (a cell is recipe + sampler), each key's rule and error text,
                 the checks on `_target_` and results_dir
    resolved.py  a composed config -> the resolved cell: its sampler (SamplerConfig), its recipe
                 (d2c.recipes), cell_id and train_key
    sweep.py     command-line overrides -> the plan (every cell composed, resolved and keyed)
    cell.py      one cell: train or find its stages, sample, measure, write its record; the summary
    search.py    search=front: each family's speed-vs-FID front over its sampler settings (Optuna)
"""
from .cell import (PREPARE, base_record, cell_work, failed_record, prepare_cell, print_summary, record_env, run_cell,
                   summary_table)
from .resolved import build_recipe, describe, keys, resolve, sampler_of
from .schema import (DATA_OPTIONS, FILE_KEYS, GPT_PRESETS, KEYS, KNOB_KEYS, MAR_PRESETS, RULES,
                     ConfigError, RunConfig, allowed, check_results_dir, check_results_tree, check_target,
                     family_of, register_configs)
from .search import SEARCH_RULES, SearchConfig, run_search
from .search import bases as search_bases
from .search import split_args as split_search_args
from .sweep import DEFAULT_SWEEP, compose_cell, expand, hydra_error, plan

__all__ = ["PREPARE", "base_record", "cell_work", "failed_record", "prepare_cell", "print_summary", "record_env",
           "run_cell", "summary_table", "build_recipe", "describe", "keys", "resolve", "sampler_of",
           "DATA_OPTIONS", "FILE_KEYS", "GPT_PRESETS", "KEYS", "KNOB_KEYS", "MAR_PRESETS", "RULES",
           "ConfigError", "RunConfig", "allowed", "check_results_dir", "check_results_tree",
           "check_target", "family_of", "register_configs", "DEFAULT_SWEEP", "compose_cell",
           "expand", "hydra_error", "plan", "SEARCH_RULES", "SearchConfig", "run_search", "search_bases", "split_search_args"]
