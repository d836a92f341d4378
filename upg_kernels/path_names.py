"""The path names (``path=``, ``UPG_KERNELS_PATH``): the one list of them.

It imports nothing, so that :mod:`upg_kernels.settings` (which must import without triton and without
the library's heavy modules) and :mod:`upg_kernels.kernels.paths` (what each path is: its row of
``PATHS``, eligibility, pins) read the same names. A new path is a name here and its row there
(tests/test_paths.py checks that the two agree).
"""
TWO_PASS = "two_pass"
TWO_PASS_GEMM_FORWARD = "two_pass_gemm_forward"
ONE_PASS = "one_pass"

PATH_NAMES = (TWO_PASS, TWO_PASS_GEMM_FORWARD, ONE_PASS)
