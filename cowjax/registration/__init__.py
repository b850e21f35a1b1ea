"""Registration: landmark-based (subject to subject) and rigid intensity-based (to a template).

- ``landmarks``: closed-form rigid/similarity fits between landmark sets, residuals, leave-one-out TRE.
- ``intensity``: JAX rigid registration by NCC (the paper's preprocessing), the synthetic template,
  ``template_registration(config.data)``: the ``to_template`` that training and prediction inject
  into preprocessing (the data package imports no registration code).
The command that registers two images through detected landmarks, ``--mode=register``, is
``inference/register.py``: it needs the detector.
"""
