"""The PEFT side: ``AqlmLoraLinear`` (layer.py), how PEFT builds it (dispatch.py: ``dispatch_aqlm``,
``register``) and the switch that runs plain ``aqlm.QuantizedLinear`` layers on our kernels
(fused_base.py). layer.py and dispatch.py need ``peft`` and ``aqlm``; import them directly."""
