// The demo behind `hydravm demo` (the front door of src/demo).
export { runDemo, demoSpec, type DemoOptions } from './demo.js';
