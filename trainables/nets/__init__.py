"""Networks: backbones, DDU soft spectral normalisation and the (center) losses."""
