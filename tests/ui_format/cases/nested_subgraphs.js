// Subgraphs: one inside another; a subgraph input fed from outside (a node), and a second instance of the same
// subgraph whose input is not linked, so its promoted widget's own value is used.
const image = add("EmptyImage", [0, 0], { width: 24, height: 16, color: 255 });
const invert = add("ImageInvert", [300, 0]);
const blur = add("ImageBlur", [600, 0], { blur_radius: 3 });
const save = add("SaveImage", [900, 0], { filename_prefix: "nested" });
const radius = add("PrimitiveInt", [300, 300], { value: 5 });
image.connect(0, invert, 0);
invert.connect(0, blur, 0);
blur.connect(0, save, 0);
radius.connect(0, blur, slot(blur, "blur_radius"));
const inner = app.graph.convertToSubgraph(new Set([invert, blur]));
app.graph.convertToSubgraph(new Set([inner.node, save]));
const second = app.graph.convertToSubgraph(new Set([add("ImageBlur", [0, 600]), add("SaveImage", [300, 600])]));
image.connect(0, second.node, 0);
