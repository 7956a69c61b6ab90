/*
 * kdlab's Cockpit page.
 *
 * Everything it shows comes from kdlab's public D-Bus API on the system bus
 * (xml/dbus/*.xml): the VMs, images and jobs are proxies the bridge keeps up
 * to date from the ObjectManager's InterfacesAdded/Removed and each object's
 * PropertiesChanged, so the page never polls and never reloads. Actions on
 * existing objects are D-Bus calls; what needs the user's own files or a
 * terminal (create from paths, the serial console, the boot log) runs
 * kdlabctl through the bridge as the logged-in user, since kdlabd never
 * opens a caller's path. Errors are shown as the D-Bus error's message or
 * kdlabctl's own sentence.
 */
"use strict";

const BUS_NAME = "org.kdlab.Kdlab1";
const ROOT_PATH = "/org/kdlab/Kdlab1";
const VM_IFACE = "org.kdlab.Kdlab1.VM";
const IMAGE_IFACE = "org.kdlab.Kdlab1.Image";
const JOB_IFACE = "org.kdlab.Kdlab1.Job";
// A Stop waits for the guest for up to 30 s (kdlabd's default) before it
// pulls the plug: the call must be allowed to outlast that.
const STOP_TIMEOUT_MS = 120 * 1000;
const OFF_STATES = new Set(["defined", "stopped", "crashed"]);
const ACTIVE_STATES = new Set(["running", "paused"]);

const client = cockpit.dbus(BUS_NAME, { bus: "system" });

const $ = (selector) => document.querySelector(selector);

function element(tag, attributes = {}, text = "") {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes))
        node.setAttribute(key, value);
    if (text)
        node.textContent = text;
    return node;
}

/* Errors: one line, the message kdlabd (or kdlabctl) wrote for people. */

function errorText(error) {
    if (typeof error === "string")
        return error;
    // A D-Bus error's message, or a spawned kdlabctl's stderr ("err: message").
    let text = (error && (error.message || error.problem)) || String(error);
    text = text.trim().split("\n")
        .map(line => line.replace(/^kdlabctl: /, ""))
        .join("\n");
    return text;
}

function showError(error) {
    $("#error").textContent = errorText(error);
    $("#error-bar").hidden = false;
}

function clearError() {
    $("#error").textContent = "";
    $("#error-bar").hidden = true;
}

$("#error-dismiss").addEventListener("click", clearError);

/* Owners: the bus gives uids; people read names (getent, as the user).
 * Served by kdlabctl web --host, kdlabd is on another host, whose uids this
 * machine's passwd does not name: kdlabctl web says who the page is there
 * ($KDLAB_WEB_HOST_CALLER, "UID:USER"); that uid is named, any other is its
 * number, as kdlabctl --host shows them. */

const HOST_CALLER_ENV = "KDLAB_WEB_HOST_CALLER";
const hostCaller = cockpit.spawn(["printenv", HOST_CALLER_ENV])
        .then(text => {
            const [uid, ...name] = text.trim().split(":");
            return uid ? { uid: Number(uid), user: name.join(":") } : null;
        })
        .catch(() => null); // not set: this machine's kdlabd (or Cockpit's own)

const userNames = new Map();

function localName(uid) {
    return cockpit.spawn(["getent", "passwd", String(uid)])
            .then(line => line.split(":")[0] || String(uid))
            .catch(() => String(uid));
}

function userName(uid) {
    if (!userNames.has(uid)) {
        userNames.set(uid, hostCaller.then(caller => {
            if (!caller)
                return localName(uid);
            return uid === caller.uid ? caller.user : String(uid);
        }));
    }
    return userNames.get(uid);
}

function showOwner(cell, uid) {
    cell.textContent = String(uid);
    userName(uid).then(name => { cell.textContent = name });
}

/* VMs */

const vmRows = new Map(); // object path -> tr

function vmButton(action, label, onclick) {
    const button = element("button", { type: "button", "data-action": action }, label);
    button.addEventListener("click", onclick);
    return button;
}

function runAction(promise) {
    clearError();
    return promise.catch(showError);
}

function vmCall(proxy, method, args, options) {
    return runAction(client.call(proxy.path, VM_IFACE, method, args, options));
}

function newVMRow(proxy) {
    const row = element("tr", { "data-vm": proxy.Name });
    for (const field of ["name", "state", "owner", "accel", "gdb", "debugger", "diagnosis"])
        row.appendChild(element("td", { "data-field": field }));
    const actions = element("td", { class: "actions" });
    actions.append(
        vmButton("start", "Start", () => vmCall(proxy, "Start", [{}])),
        vmButton("start-paused", "Start paused",
                 () => vmCall(proxy, "Start", [{ paused: { t: "b", v: true } }])),
        vmButton("stop", "Stop", () => vmCall(proxy, "Stop", [{}], { timeout: STOP_TIMEOUT_MS })),
        vmButton("force-stop", "Force stop",
                 () => vmCall(proxy, "Stop", [{ force: { t: "b", v: true } }])),
        vmButton("delete", "Delete", () => confirmDelete(proxy)),
        vmButton("console", "Console", () => openConsole(proxy.Name)),
        vmButton("logs", "Log", () => showLog(proxy.Name)),
    );
    row.appendChild(actions);
    return row;
}

function field(row, name) {
    return row.querySelector(`[data-field="${name}"]`);
}

function updateVMRow(row, proxy) {
    const state = proxy.State;
    field(row, "name").textContent = proxy.Name;
    const stateCell = field(row, "state");
    stateCell.textContent = state;
    stateCell.className = `state state-${state}`;
    if (row.dataset.owner !== String(proxy.Owner)) {
        row.dataset.owner = String(proxy.Owner);
        showOwner(field(row, "owner"), proxy.Owner);
    }
    field(row, "accel").textContent = proxy.Accel;
    field(row, "gdb").textContent = proxy.GdbStub;
    field(row, "debugger").textContent = proxy.WaitingForDebugger ? "waiting for gdb" : "";
    const [code, severity, cause, fix] = proxy.Diagnosis || ["", "", "", ""];
    const diagnosis = field(row, "diagnosis");
    diagnosis.replaceChildren();
    diagnosis.className = severity ? `severity-${severity}` : "";
    diagnosis.title = code;
    if (cause) {
        diagnosis.append(element("div", { class: "cause" }, `${severity}: ${cause}`));
        if (fix)
            diagnosis.append(element("div", { class: "fix" }, `Fix: ${fix}`));
    }
    const off = OFF_STATES.has(state);
    const active = ACTIVE_STATES.has(state);
    const enabled = {
        start: off, "start-paused": off, stop: active, "force-stop": active || state === "stopping",
        delete: off, console: active, logs: state !== "defined",
    };
    for (const [action, on] of Object.entries(enabled))
        row.querySelector(`button[data-action="${action}"]`).disabled = !on;
}

function sortedInsert(tbody, row, key) {
    const after = [...tbody.rows].find(other => other.dataset.key > key);
    row.dataset.key = key;
    tbody.insertBefore(row, after || null);
}

const vms = client.proxies(VM_IFACE, ROOT_PATH);

/* "#/vm/NAME" in the address (what kdlabctl notify's "Show page" opens)
 * marks that VM's row and scrolls to it, once it is listed. */

function chosenVM() {
    const match = /^#\/vm\/(.+)$/.exec(window.location.hash);
    return match ? decodeURIComponent(match[1]) : null;
}

function markChosen() {
    const chosen = chosenVM();
    for (const row of vmRows.values()) {
        const mark = row.dataset.vm === chosen;
        row.classList.toggle("chosen", mark);
        if (mark && !row.dataset.shown) {
            row.dataset.shown = "yes";
            row.scrollIntoView({ block: "center" });
        }
    }
}

window.addEventListener("hashchange", () => {
    for (const row of vmRows.values())
        delete row.dataset.shown;
    markChosen();
});

vms.addEventListener("changed", (event, proxy) => {
    if (!proxy.valid || proxy.Name === undefined)
        return;
    let row = vmRows.get(proxy.path);
    if (!row) {
        row = newVMRow(proxy);
        vmRows.set(proxy.path, row);
        sortedInsert($("#vm-list tbody"), row, proxy.Name);
        markChosen();
    }
    updateVMRow(row, proxy);
    $("#no-vms").hidden = true;
});

vms.addEventListener("removed", (event, proxy) => {
    const row = vmRows.get(proxy.path);
    if (row)
        row.remove();
    vmRows.delete(proxy.path);
    $("#no-vms").hidden = vmRows.size > 0;
});

const CONNECTING = $("#status").textContent;

function connected() {
    // The owner event may have said meanwhile that kdlabd is not running.
    if ($("#status").textContent === CONNECTING)
        $("#status").textContent = "";
}

vms.wait(connected).catch(error => {
    connected();
    showError(error);
});

// kdlabd restarts (an update, systemctl restart): the bus name loses its
// owner, then gets a new one, whose objects the bridge reads again.
client.addEventListener("owner", (event, owner) => {
    $("#status").textContent = owner ? "" : "kdlabd is not running: waiting for it to start";
});

client.addEventListener("close", (event, options) => {
    $("#status").textContent = "Disconnected from kdlabd";
    if (options && options.problem)
        showError(options.message || options.problem);
});

/* Delete, with a confirmation */

function confirmDelete(proxy) {
    const dialog = $("#confirm");
    $("#confirm-text").textContent =
        `Delete VM ${proxy.Name}? Its kernel, disk overlay and console logs are removed.`;
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
        if (dialog.returnValue === "confirm")
            vmCall(proxy, "Delete", []);
    }, { once: true });
    dialog.showModal();
}

/* Create: kdlabctl opens the files as the logged-in user */

function createVM(event) {
    event.preventDefault();
    const form = event.target;
    const value = (name) => form.elements[name].value.trim();
    const argv = ["kdlabctl", "create", value("name"), "--kernel", value("kernel")];
    if (value("initrd"))
        argv.push("--initrd", value("initrd"));
    if (value("image"))
        argv.push("--image", value("image"));
    if (value("memory"))
        argv.push("--memory", value("memory"));
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    runAction(cockpit.spawn(argv, { err: "message" }).then(() => {
        form.elements.name.value = "";
    })).finally(() => {
        submit.disabled = false;
    });
}

$("#create-form").addEventListener("submit", createVM);

/* The serial console: kdlabctl console on a pty, in xterm.js */

const terminal = new Terminal({ rows: 24, cols: 100, convertEol: false, scrollback: 5000 });
terminal.open($("#console"));
let consoleChannel = null;

function detachConsole() {
    if (consoleChannel) {
        consoleChannel.close();
        consoleChannel = null;
    }
    $("#console-detach").disabled = true;
}

function openConsole(name) {
    clearError();
    detachConsole();
    terminal.reset();
    $("#console-title").textContent = `Serial console: ${name}`;
    const channel = cockpit.channel({
        payload: "stream",
        spawn: ["kdlabctl", "console", name],
        pty: true,
        environ: ["TERM=xterm-256color"],
        window: { rows: terminal.rows, cols: terminal.cols },
    });
    consoleChannel = channel;
    channel.addEventListener("message", (event, data) => terminal.write(data));
    channel.addEventListener("close", (event, options) => {
        if (consoleChannel === channel) {
            consoleChannel = null;
            $("#console-detach").disabled = true;
        }
        // kdlabctl wrote its reason on the terminal; a failure to run it at all is ours.
        if (options && options.problem && options.problem !== "terminated")
            showError(options.message || options.problem);
    });
    $("#console-detach").disabled = false;
    terminal.focus();
    showLog(name);
}

terminal.onData(data => {
    if (consoleChannel)
        consoleChannel.send(data);
});

$("#console-detach").addEventListener("click", detachConsole);

/* The boot log: kdlabctl logs -f, followed until the VM is off */

let logProcess = null;

function showLog(name) {
    if (logProcess)
        logProcess.close("terminated");
    const log = $("#log");
    log.textContent = "";
    $("#log-title").textContent = `Boot log: ${name}`;
    const process = cockpit.spawn(["kdlabctl", "logs", "-f", name], { err: "message" });
    logProcess = process;
    process.stream(text => {
        log.append(text);
        log.scrollTop = log.scrollHeight;
    }).catch(error => {
        if (logProcess === process && error.problem !== "terminated")
            log.append(errorText(error));
    });
}

/* Images and jobs */

function formatBytes(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(bytes);
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
        value /= 1024;
        unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function followObjects(iface, tbody, key, render) {
    const rows = new Map();
    const proxies = client.proxies(iface, ROOT_PATH);
    proxies.addEventListener("changed", (event, proxy) => {
        if (!proxy.valid || proxy.Name === undefined && proxy.Id === undefined)
            return;
        let row = rows.get(proxy.path);
        if (!row) {
            row = element("tr");
            rows.set(proxy.path, row);
            sortedInsert(tbody, row, key(proxy));
        }
        render(row, proxy);
    });
    proxies.addEventListener("removed", (event, proxy) => {
        const row = rows.get(proxy.path);
        if (row)
            row.remove();
        rows.delete(proxy.path);
    });
    return proxies;
}

function cells(row, count) {
    while (row.cells.length < count)
        row.insertCell();
    return [...row.cells];
}

function renderImage(row, proxy) {
    row.dataset.image = proxy.Name;
    const [name, format, size, allocated, owner, usedBy] = cells(row, 6);
    name.textContent = proxy.Name;
    format.textContent = proxy.Format;
    size.textContent = formatBytes(proxy.Capacity);
    allocated.textContent = formatBytes(proxy.Allocation);
    if (owner.dataset.uid !== String(proxy.Owner)) {
        owner.dataset.uid = String(proxy.Owner);
        showOwner(owner, proxy.Owner);
    }
    usedBy.textContent = (proxy.UsedBy || []).join(", ");
}

const images = followObjects(IMAGE_IFACE, $("#image-list tbody"), proxy => proxy.Name,
                             renderImage);

// The create form offers the images there are.
function updateImageChoices() {
    const select = $("#create-form select[name=image]");
    const chosen = select.value;
    const names = Object.values(images).filter(proxy => proxy.valid).map(proxy => proxy.Name).sort();
    select.replaceChildren(element("option", { value: "" }, "none"),
                           ...names.map(name => element("option", { value: name }, name)));
    select.value = names.includes(chosen) ? chosen : "";
}
images.addEventListener("changed", updateImageChoices);
images.addEventListener("removed", updateImageChoices);

function renderJob(row, proxy) {
    row.dataset.job = String(proxy.Id);
    const [id, kind, target, state, progress, status, actions] = cells(row, 7);
    for (const [cell, name] of [[target, "target"], [state, "state"], [progress, "progress"],
                                [status, "status"]])
        cell.dataset.field = name;
    id.textContent = String(proxy.Id);
    kind.textContent = proxy.Kind;
    target.textContent = proxy.Target;
    state.textContent = proxy.State;
    let bar = progress.querySelector("progress");
    if (!bar) {
        bar = element("progress", { max: "1" });
        progress.append(bar);
    }
    bar.value = proxy.Progress;
    bar.textContent = `${Math.round(proxy.Progress * 100)} %`;
    status.textContent = proxy.State === "failed" ? `${proxy.Status} (${proxy.Error})` : proxy.Status;
    let cancel = actions.querySelector("button");
    if (!cancel) {
        cancel = element("button", { type: "button", "data-action": "cancel" }, "Cancel");
        cancel.addEventListener("click",
                                () => runAction(client.call(proxy.path, JOB_IFACE, "Cancel", [])));
        actions.append(cancel);
    }
    cancel.disabled = proxy.State !== "running";
}

// Newest job first: keys sort as text, so pad the id.
followObjects(JOB_IFACE, $("#job-list tbody"), proxy => String(1e9 - proxy.Id).padStart(10, "0"),
              renderJob);
