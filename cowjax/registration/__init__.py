"""Registration: landmark-based (subject to subject) and rigid intensity-based (to a template).

- ``landmarks``: closed-form rigid/similarity fits between landmark sets, residuals, leave-one-out TRE.
- ``intensity``: JAX rigid registration by NCC (the paper's preprocessing), the synthetic template,
  ``align_case_to_template`` for the data pipeline (``config.data.registration == "template"``).
- ``cli``: ``run_register`` behind ``launch.py --mode=register``.
"""
