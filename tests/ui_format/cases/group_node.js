// A legacy group node (Convert to Group Node): inner ids `<instance>:<index>`, a seed with its control value
// inside, widgets taken from the instance, an inner output used inside and one exposed.
const image = add("EmptyImage", [0, 0], { width: 24, height: 16, color: 255 });
const invert = add("ImageInvert", [300, 0]);
const blur = add("ImageBlur", [600, 0], { blur_radius: 3, sigma: 0.5 });
const noise = add("RandomNoise", [600, 300], { noise_seed: 42 });
const save = add("SaveImage", [900, 0], { filename_prefix: "grouped" });
image.connect(0, invert, 0);
invert.connect(0, blur, 0);
blur.connect(0, save, 0);
app.canvas.deselectAll();
for (const node of [invert, blur, noise]) app.canvas.select(node);
const running = app.extensionManager.command.execute("Comfy.GroupNode.ConvertSelectedNodesToGroupNode");
await pause(1500);
const input = document.querySelector(".p-dialog input");
input.value = "InvertBlur";
input.dispatchEvent(new Event("input", { bubbles: true }));
input.dispatchEvent(new KeyboardEvent("keyup", { key: "Enter", bubbles: true }));
await Promise.race([running, pause(3000)]);
const group = app.graph.nodes.find((node) => node.type === "workflow>InvertBlur");
group.widgets.find((w) => w.name === "sigma").value = 0.75;
