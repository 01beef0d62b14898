"""gRPC I/O server for multimodal training: video/image decoding, Keye-VL-1.5 frame sampling and
Slow-Fast encoding off the training processes; uint8 frames back (RGB, or YUV 4:2:0 planes on
request), zstd-compressed.

- `io_server.client.IOClient`: what a trainer uses (in-process decoding when no address is given);
- ``io-server`` / ``python -m io_server``: the daemon;
- `io_server.keye`: the Keye-VL-1.5 processing (presets, smart_resize, Slow-Fast, token budgets);
- `io_server.resize`: the pixel paths, "exact" (Keye's released processor) and "fast" (FFmpeg);
- `io_server.yuv`: YUV 4:2:0 planes and their conversion to RGB (CPU or GPU);
- `io_server.backends`: PyAV (CPU) and DALI (NVDEC) decoding behind one interface;
- `io_server.paths`, `io_server.imagesize`: checks on hostile paths and image headers.
"""
