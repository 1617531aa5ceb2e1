"""Reference PCA for `loopc_runtime::trace::pca`: a small seeded matrix with a clear spectrum,
its top-3 principal directions (sign: largest-magnitude entry positive) and projections,
computed with numpy's SVD in float64. Writes tests/fixtures/pca/pca.safetensors."""
import os

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(7)
n, d = 40, 6
basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
scales = np.array([5.0, 3.0, 1.5, 0.3, 0.2, 0.1])
x = (rng.standard_normal((n, d)) * scales) @ basis.T + rng.standard_normal(d)
x = x.astype(np.float32)
xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
_, s, vt = np.linalg.svd(xc, full_matrices=False)
comps = vt[:3].copy()
for c in comps:
    if c[np.argmax(np.abs(c))] < 0:
        c *= -1
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "pca")
os.makedirs(out, exist_ok=True)
save_file({"x": x, "components": comps, "projections": xc @ comps.T, "variances": (s[:3] ** 2) / n},
          os.path.join(out, "pca.safetensors"))
print("wrote", os.path.normpath(os.path.join(out, "pca.safetensors")))
