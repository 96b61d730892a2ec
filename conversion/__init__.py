"""Conversion of VL-T5 / VL-Adapter / T5 checkpoints into `JointEncoderModel` directories (see
`conversion/convert_vl_t5_checkpoint.py`)."""
