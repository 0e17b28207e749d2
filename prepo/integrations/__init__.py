"""PREPO on other RL frameworks' trainers.

Each framework lives in its own module, imported explicitly so that none of them is a dependency
of the others or of ``prepo`` itself:

    from prepo.integrations.trl import PrepoGRPOConfig, PrepoGRPOTrainer   # pip install "prepo[trl]"
"""
