"""Pure tensor kernels: merging, matching. No modules, files or models here."""
