"""PREPO on other RL frameworks' trainers.

Each framework lives in its own module, imported explicitly so that none of them is a dependency
of the others or of ``prepo`` itself:

    from prepo.integrations.trl import PrepoGRPOConfig, PrepoGRPOTrainer   # pip install "prepo[trl]"
    # verl: trainer.v1.trainer_mode=prepo (see prepo.integrations.verl)   # pip install "prepo[verl]"
"""
