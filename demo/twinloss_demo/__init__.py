"""twinloss_demo: the ``twinloss`` command line and the two-minute demo, outside the library.

Installed with the core package; what it needs beyond the core (Pillow, tqdm)
comes with the ``demo`` extra: ``pip install "twinloss[demo]"``. The command
says which extra is missing instead of failing with an ImportError.
"""
