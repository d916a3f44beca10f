"""3D input and output: mesh loading with limits, headless multiview rendering, multiview
features -> voxels, and Gaussian splatting."""
