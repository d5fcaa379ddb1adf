"""lowrank-opt's shipped configs, installed as the package data ``lowrank_opt.configs``.

This folder is the one copy: model configs (``llama_*.json``), the default run (``tiny.yaml``), DeepSpeed
configs (``deepspeed/``), the offline tokenizer (``tokenizer/``) and a small SFT example (``data/``). A
checkout uses it in place (``python train.py --config configs/tiny.yaml``); an installed package finds it
through ``importlib.resources`` (:mod:`lowrank_opt.resources`), from any working directory.
"""
