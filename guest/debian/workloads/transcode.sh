#!/bin/bash
# transcode: ffmpeg decodes the first HYDRA_SCALE seconds (default 20) of a generated H.264 test
# video (lavfi testsrc, 640x360, 25 fps, made when the image was built) and encodes them to MPEG-4;
# one step per frame.
set -eo pipefail
secs=${HYDRA_SCALE:-20}
frames=$((secs * 25))
ffmpeg -nostdin -hide_banner -loglevel error -t "$secs" -i /usr/src/hydra/input.mp4 \
  -c:v mpeg4 -q:v 5 -an -progress pipe:1 -y out.mp4 |
  # A bash loop, not awk: Debian's awk (mawk) reads a pipe in blocks, which would hold the lines back.
  while IFS='=' read -r key value; do
    if [ "$key" = frame ]; then echo "hydra-workload: name=$HYDRA_NAME step=$value of=$frames"; fi
  done
