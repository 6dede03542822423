"""Shared checks for kernel tests (the tolerance rule of DESIGN.md)."""


def assert_close_by_rule(out, ref64, ref_lowp, name="", slack=2.0, atol=1e-6):
    """|out - ref64| <= slack * |ref_lowp - ref64| + atol * scale, elementwise maxima.

    ``ref_lowp`` is the pure-torch reference computed in the kernel's own dtype: a kernel may
    be at most ~2x as wrong as torch itself would be in that precision.
    """
    out, ref64, ref_lowp = out.double(), ref64.double(), ref_lowp.double()
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp - ref64).abs().max().item() if out.numel() else 0.0
    bound = slack * base + atol * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch same-dtype error {base:.3e})"
