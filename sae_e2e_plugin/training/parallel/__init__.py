"""Data-parallel training under torchrun: the process group and its collectives
(``distributed``) and the rules that make several ranks train as one (``data_parallel``)."""
