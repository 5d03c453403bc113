// Guest images built from distribution packages (`hydravm image build`).
export { buildDebianImage, findDebianImage, DEBIAN_CMDLINE, DEFAULT_PACKAGES, DEFAULT_SIZE, WORKLOAD_IMAGE, WORKLOAD_PACKAGES, type BuiltImage, type BuildImageOptions, type ImageInfo } from './debian.js';
export { hostDebianSources, type DebianSources } from './sources.js';
export { assertFreeSpace, debianBuildNeeds } from './space.js';
