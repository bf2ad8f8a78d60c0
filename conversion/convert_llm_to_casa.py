"""Convert a local text LLM folder + the vision tower of a Qwen2.5-VL folder into a CASA checkpoint
(same as `casa-hf convert llm`).

    python conversion/convert_llm_to_casa.py /path/to/helium-1-2b /path/to/Qwen2.5-VL-3B /path/to/casa-helium
"""

import sys

from casa_hf.cli import main

if __name__ == "__main__":
    main(["convert", "llm", *sys.argv[1:]])
