//! Not burn's libtorch backend: see this crate's Cargo.toml. In the amp
//! workspace, libtorch is reached through amp-tch.
compile_error!(
    "burn's `tch` backend is not available in the amp workspace (its torch-sys 0.22 \
     conflicts with amp-tch's torch-sys 0.24); use amp-tch, or burn's flex/cuda/wgpu devices"
);
