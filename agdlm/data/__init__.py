from agdlm.data.loader import Data, build_data
from agdlm.data.tokenizer import EOT_TOKEN, gpt2_encoding

__all__ = ["Data", "build_data", "EOT_TOKEN", "gpt2_encoding"]
