"""awm-fast: Advantage Weighted Matching for flow-matching diffusion transformers."""
from awm_fast.logs import install_default_handler

install_default_handler()  # messages print on stdout like before; see awm_fast/logs.py to silence or redirect them
