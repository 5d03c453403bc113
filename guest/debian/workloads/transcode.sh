#!/bin/bash
# transcode: ffmpeg decodes the first HYDRA_SCALE seconds (default 20) of a generated H.264 test
# video (lavfi testsrc, 640x360, 25 fps, made when the image was built) and encodes them to MPEG-4;
# one step per frame.
set -eo pipefail
secs=${HYDRA_SCALE:-20}
frames=$((secs * 25))
ffmpeg -nostdin -hide_banner -loglevel error -t "$secs" -i /usr/src/hydra/input.mp4 \
  -c:v mpeg4 -q:v 5 -an -progress pipe:1 -y out.mp4 |
  awk -F= -v n="$HYDRA_NAME" -v t="$frames" \
    '$1 == "frame" { printf "hydra-workload: name=%s step=%d of=%d\n", n, $2, t; fflush() }'
