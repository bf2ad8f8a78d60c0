"""CASA-SmolLM2, the built-in `casa-smollm2`: SmolLM2-135M-Instruct made a vision-language model with CASA.

`model` (the recipe, the model it builds, its added weights), `assembly` (the shipped weights in `weights/` joined with
the installed SmolLM2, `gguf_llm`), `natural_vqa` (its English questions), `vision_pretraining` and `train`
(`casa-hf train-smollm2`), `demo` (`casa-hf demo` in English).
"""
