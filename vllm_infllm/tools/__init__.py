"""User-facing tools built on the adapter and the core.

    assets.py   the offline model (SmolLM2-135M from a GGUF) and haystack data; `python -m
                vllm_infllm.assets {convert,verify,where}`
    demo.py     the main job: passkey retrieval beyond the local window (`python -m vllm_infllm.demo`)
    passkey.py  the classic passkey prompt, sized in model tokens
    niah.py     needle-in-a-haystack prompts over Paul Graham essays
"""
