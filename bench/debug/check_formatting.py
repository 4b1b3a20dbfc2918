"""Which error messages of an extension built on this machine crash the process when raised?

Builds a tiny torch extension with the same toolchain as tokenweave._C and raises errors whose messages
stream an integer, a std::to_string'd integer or plain text, each in its own process.
"""
import subprocess
import sys
import tempfile

from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <sstream>
void check_int(int64_t v) { TORCH_CHECK(false, "n=", v); }
void check_to_string(int64_t v) { TORCH_CHECK(false, "n=", std::to_string(v)); }
void check_text(int64_t) { TORCH_CHECK(false, "plain text"); }
void value_int(int64_t v) { TORCH_CHECK_VALUE(false, "n=", v); }
void value_to_string(int64_t v) { TORCH_CHECK_VALUE(false, "n=", std::to_string(v)); }
void type_int(int64_t v) { TORCH_CHECK_TYPE(false, "n=", v); }
void type_text(int64_t) { TORCH_CHECK_TYPE(false, "plain text"); }
std::string stream_int(int64_t v) { std::ostringstream s; s << v; return s.str(); }
"""
NAMES = ["check_int", "check_to_string", "check_text", "value_int", "value_to_string", "type_int", "type_text",
         "stream_int"]

if __name__ == "__main__":
    build = tempfile.mkdtemp()
    if len(sys.argv) == 1:
        load_inline("fmtcheck", cpp_sources=SRC, functions=NAMES, build_directory=build, verbose=False)
        for name in NAMES:
            p = subprocess.run([sys.executable, __file__, build, name], capture_output=True, text=True, timeout=120)
            print(f"{name:>16}: rc={p.returncode} {p.stdout.strip()[-120:]}")
    else:
        m = load_inline("fmtcheck", cpp_sources=SRC, functions=NAMES, build_directory=sys.argv[1], verbose=False)
        try:
            print("returned", getattr(m, sys.argv[2])(5))
        except Exception as e:
            print(type(e).__name__, str(e).splitlines()[0][:80])
