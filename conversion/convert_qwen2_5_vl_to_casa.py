"""Convert a local Qwen2.5-VL checkpoint folder into a CASA checkpoint (same as `casa-hf convert qwen2_5_vl`).

python conversion/convert_qwen2_5_vl_to_casa.py /path/to/Qwen2.5-VL-3B-Instruct /path/to/casa-qwen --verify
"""

import sys

from casa_hf.cli import main

if __name__ == "__main__":
    main(["convert", "qwen2_5_vl", *sys.argv[1:]])
