"""The web console in real headless Chromium against the real daemon with real (idle) VMs."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.api.browser import (
    chromium,
    console_errors,
    find,
    requested_urls,
    screenshot,
    visible,
    wait,
)
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.idle_image import IDLE_IMAGE
from tests.support.kms_peer import KmsPeer, decrypt_env
from tests.support.vm_ops import (
    create,
    free_port,
    idle_config,
    prepare_images,
    rpc,
    status_of,
    wait_for,
)

TOKEN = "console-t0ken"


@pytest.fixture(scope="module")
def vmm(short_tmp: Path, kms: KmsPeer) -> Iterator[DaemonProcess]:
    """A daemon with the idle image, the test KMS, and a short shutdown timeout."""
    prepare_images(short_tmp)
    config = f'kms_url = "{kms.url}"\n' + idle_config("shutdown_timeout = 3")
    proc = start_daemon(short_tmp, extra_config=config)
    try:
        yield proc
    finally:
        proc.destroy()


@pytest.fixture(scope="module")
def browser(vmm: DaemonProcess) -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        driver.get("about:blank")
        requested_urls(driver)  # drain what the browser itself loaded at start (chrome://...)
        driver.get(vmm.base_url + "/")
        wait(driver, "the event stream", lambda d: find(d, "#live").text == "live")
        yield driver


@pytest.fixture
def client(vmm: DaemonProcess) -> Iterator[httpx.Client]:
    with vmm.client() as c:
        yield c


def row(driver: webdriver.Chrome, vm_id: str) -> object:
    found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-id="{vm_id}"]')
    return found[0] if found else None


def click_action(driver: webdriver.Chrome, vm_id: str, action: str) -> None:
    """Click a row's button once it is enabled (rows are re-rendered on every event)."""

    def enabled(d: webdriver.Chrome) -> bool:
        buttons = d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{vm_id}"] button[data-action="{action}"]')
        return bool(buttons) and buttons[0].is_enabled()

    wait(driver, f"{action} enabled", enabled)
    driver.execute_script(
        "document.querySelector(arguments[0]).click()",
        f'tr[data-id="{vm_id}"] button[data-action="{action}"]')


def confirm(driver: webdriver.Chrome) -> None:
    wait(driver, "the confirm dialog", lambda d: visible(d, "#confirm-yes"))
    find(driver, "#confirm-yes").click()


def row_status(driver: webdriver.Chrome, vm_id: str) -> str:
    return str(driver.execute_script(
        "const s = document.querySelector(`tr[data-id='${arguments[0]}'] .status`);"
        "return s ? s.textContent : 'gone';", vm_id))


def test_page_loads_with_no_errors_and_nothing_from_another_host(
    vmm: DaemonProcess, browser: webdriver.Chrome
) -> None:
    """The console, its modules and its first calls load cleanly, all from the daemon itself."""
    wait(browser, "the version", lambda d: find(d, "#version").text.startswith("v"))
    assert find(browser, "#total").text.startswith("Total Instances:")
    assert console_errors(browser) == []
    urls = requested_urls(browser)
    assert any(u.endswith("/res/console/app.js") for u in urls)
    # Anything that leaves the browser (http, https, ws) must go to the daemon.
    network = [u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss")]
    foreign = [u for u in network if not u.startswith(vmm.base_url + "/")]
    assert foreign == []


def test_a_vm_created_through_the_api_appears_without_a_reload(
    browser: webdriver.Chrome, client: httpx.Client
) -> None:
    """The list follows /events: a VM made with curl shows up in the open page."""
    browser.execute_script("window.__sameDocument = true")
    vm_id = create(client, name="from-api", stopped=True)
    wait(browser, "the new row", lambda d: row(d, vm_id))
    assert browser.execute_script("return window.__sameDocument") is True
    assert row_status(browser, vm_id) == "stopped"


def test_deploy_dialog_creates_the_vm_its_preview_promised(
    browser: webdriver.Chrome, client: httpx.Client
) -> None:
    """Compose hash and app id match the preview; the env reaches the daemon encrypted to the KMS key."""
    find(browser, "#deploy-open").click()
    wait(browser, "the deploy dialog", lambda d: visible(d, "#deploy-form [name=name]"))
    wait(browser, "images", lambda d: Select(find(d, "[name=image]")).options)
    form = find(browser, "#deploy-form")
    form.find_element(By.NAME, "name").send_keys("deployed")
    Select(form.find_element(By.NAME, "image")).select_by_value(IDLE_IMAGE)
    memory = form.find_element(By.NAME, "memory")
    memory.clear()
    memory.send_keys("64")
    Select(form.find_element(By.NAME, "memory_unit")).select_by_value("1")
    disk = form.find_element(By.NAME, "disk_size")
    disk.clear()
    disk.send_keys("1")
    form.find_element(By.NAME, "docker_compose").send_keys("services:\n  web:\n    image: nginx\n")
    form.find_element(By.NAME, "env").send_keys("API_KEY=s3cret\nGREETING=hello world\n")
    form.find_element(By.NAME, "user_config").send_keys('{"role": "web"}')
    form.find_element(By.NAME, "stopped").click()
    wait(browser, "the preview", lambda d: len(find(d, "#preview-app-id").text) == 40)
    preview_hash = find(browser, "#preview-hash").text
    preview_app = find(browser, "#preview-app-id").text
    screenshot(browser, "deploy-dialog")
    find(browser, "#deploy-submit").click()
    wait(browser, "the dialog to close", lambda d: not visible(d, "#deploy-form [name=name]"))

    vms = [vm for vm in rpc(client, "Status", {"keyword": "deployed"})["vms"]
           if vm["name"] == "deployed"]
    assert len(vms) == 1
    config = vms[0]["configuration"]
    compose = config["compose_file"]
    assert hashlib.sha256(compose.encode()).hexdigest() == preview_hash
    assert rpc(client, "GetComposeHash", {"name": "deployed", "compose_file": compose})["hash"] \
        in (preview_hash, preview_hash[:40])
    assert vms[0]["app_id"] == preview_app == preview_hash[:40]
    assert json.loads(compose)["allowed_envs"] == ["API_KEY", "GREETING"]
    assert config["user_config"] == '{"role": "web"}'
    plain = decrypt_env(bytes.fromhex(preview_app), bytes.fromhex(config["encrypted_env"]))
    assert plain == {"env": [{"key": "API_KEY", "value": "s3cret"},
                             {"key": "GREETING", "value": "hello world"}]}
    wait(browser, "the deployed row", lambda d: row(d, vms[0]["id"]))
    screenshot(browser, "list")


def test_clone_creates_a_copy_of_a_vm(browser: webdriver.Chrome, client: httpx.Client) -> None:
    """Clone opens the deploy dialog filled from a VM; submitting creates a VM with its compose."""
    source = create(client, name="original", stopped=True, user_config="cfg")
    click_action(browser, source, "clone")
    wait(browser, "the clone dialog", lambda d: find(d, "#deploy-form [name=name]")
         .get_attribute("value") == "original-clone")
    find(browser, "#deploy-form [name=stopped]").click()
    find(browser, "#deploy-submit").click()
    wait(browser, "the dialog to close", lambda d: not visible(d, "#deploy-form [name=name]"))
    vms = {vm["name"]: vm for vm in rpc(client, "Status", {"keyword": "original"})["vms"]}
    original, clone = vms["original"]["configuration"], vms["original-clone"]["configuration"]
    assert clone["user_config"] == original["user_config"] == "cfg"
    assert json.loads(clone["compose_file"])["docker_compose_file"] == \
        json.loads(original["compose_file"])["docker_compose_file"]
    assert (clone["vcpu"], clone["memory"], clone["image"]) == \
        (original["vcpu"], original["memory"], original["image"])


def test_swagger_ui_renders_every_rpc_offline(
    vmm: DaemonProcess, browser: webdriver.Chrome
) -> None:
    """/api-docs/docs shows the generated operations with nothing loaded from another host."""
    requested_urls(browser), console_errors(browser)  # drain what earlier pages logged
    browser.get(vmm.base_url + "/api-docs/docs")
    wait(browser, "the operations", lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 30)
    assert "/prpc/CreateVm" in browser.page_source
    network = [u for u in requested_urls(browser) if u.split(":", 1)[0] in ("http", "https")]
    assert [u for u in network if not u.startswith(vmm.base_url + "/")] == []
    assert console_errors(browser) == []
    browser.get(vmm.base_url + "/")
    wait(browser, "the event stream", lambda d: find(d, "#live").text == "live")


def test_without_the_stream_the_list_is_polled(
    vmm: DaemonProcess, browser: webdriver.Chrome, client: httpx.Client
) -> None:
    """With /events unreachable the page says "polling" and still shows new VMs; then live again."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events*"]})
    try:
        browser.refresh()
        wait(browser, "polling", lambda d: find(d, "#live").text == "polling")
        vm_id = create(client, name="polled", stopped=True)
        wait(browser, "the polled VM", lambda d: row(d, vm_id))
        assert find(browser, "#live").text == "polling"
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    wait(browser, "the stream again", lambda d: find(d, "#live").text == "live")


def test_logs_follow_live_and_the_buttons_drive_the_lifecycle(
    vmm: DaemonProcess, browser: webdriver.Chrome, client: httpx.Client
) -> None:
    """Details follow the serial log and show a NIC's leased IP; Shutdown, Start, Stop, Update and
    Remove work from the page."""
    vm_id = create(client, name="buttons")
    mac = rpc(client, "GetInfo", {"id": vm_id})["info"]["interfaces"][0]["mac"]
    rpc(client, "ReportDhcpLease", {"mac": mac, "ip": "10.88.0.77", "event": "add"})
    wait(browser, "the running row", lambda d: row_status(d, vm_id) in ("running", "booting"))
    browser.execute_script(
        "document.querySelector(`tr[data-id='${arguments[0]}'] button[data-action=details]`).click()",
        vm_id)
    wait(browser, "the log view", lambda d: visible(d, "#log-output"))
    nic_cells = "//h3[text()='Network interfaces']/following-sibling::table[1]//td"
    wait(browser, "the leased IP in the NIC table", lambda d: "10.88.0.77" in [
        cell.text for cell in d.find_elements(By.XPATH, nic_cells)])
    serial = vmm.workdir / "state" / "vm" / vm_id / "serial.log"
    with serial.open("a") as fp:
        fp.write("console-test: first line\n")
        fp.flush()
    wait(browser, "the first line", lambda d: "first line" in find(d, "#log-output").text)
    with serial.open("a") as fp:
        fp.write("console-test: second line\n")
    wait(browser, "the second line", lambda d: "second line" in find(d, "#log-output").text)
    screenshot(browser, "vm-details")
    browser.execute_script("document.getElementById('log-output').scrollIntoView()")
    screenshot(browser, "vm-logs")
    browser.execute_script("window.scrollTo(0, 0)")

    click_action(browser, vm_id, "shutdown")
    # The idle guest ignores ACPI: the shutdown ends with a hard stop after the timeout,
    # and the page says so.
    wait(browser, "stopped after shutdown", lambda d: row_status(d, vm_id) == "stopped", 60)
    wait(browser, "how the shutdown ended",
         lambda d: "forced" in " ".join(n.text for n in d.find_elements(By.CSS_SELECTOR, ".notice-item")))

    click_action(browser, vm_id, "start")
    wait(browser, "running again", lambda d: row_status(d, vm_id) in ("running", "booting"))
    click_action(browser, vm_id, "stop")
    confirm(browser)
    wait(browser, "stopped", lambda d: row_status(d, vm_id) == "stopped")
    assert status_of(client, vm_id) == "stopped"

    click_action(browser, vm_id, "update")
    wait(browser, "the update dialog", lambda d: find(d, "#deploy-submit").text == "Update")
    user_config = find(browser, "#deploy-form [name=user_config]")
    user_config.clear()
    user_config.send_keys("updated-config")
    find(browser, "#deploy-submit").click()
    wait_for("the update", lambda: rpc(client, "GetInfo", {"id": vm_id})["info"]
             ["configuration"]["user_config"] == "updated-config", 30)

    click_action(browser, vm_id, "remove")
    confirm(browser)
    wait(browser, "the row to go", lambda d: row(d, vm_id) is None, 60)
    assert status_of(client, vm_id) == "gone"


def test_reload_vms_reports_what_changed(
    vmm: DaemonProcess, browser: webdriver.Chrome, client: httpx.Client
) -> None:
    """System > Reload VMs shows the daemon's counts after a directory vanished by hand."""
    vm_id = create(client, name="vanishing", stopped=True)
    copied = create(client, name="copied", stopped=True)
    vm_dir = vmm.workdir / "state" / "vm"
    # One directory vanishes; another comes back under a new id (a hand-made VM).
    new_id = "c0ffee00-0000-4000-8000-000000000001"
    shutil.copytree(vm_dir / copied, vm_dir / new_id)
    manifest = json.loads((vm_dir / new_id / "vm-manifest.json").read_text())
    (vm_dir / new_id / "vm-manifest.json").write_text(json.dumps(manifest | {"id": new_id}))
    shutil.rmtree(vm_dir / vm_id)
    find(browser, "#system-open").click()
    wait(browser, "the system dialog", lambda d: visible(d, "#reload"))
    wait(browser, "capacity", lambda d: "free" in find(d, "#capacity").text)
    find(browser, "#reload").click()
    wait(browser, "the reload result", lambda d: find(d, "#reload-result").text)
    assert find(browser, "#reload-result").text == \
        "VM reload completed: 1 loaded, 0 updated, 1 removed"
    assert IDLE_IMAGE in find(browser, "#images").text
    screenshot(browser, "system")
    browser.execute_script("document.getElementById('system').close()")
    wait(browser, "the row to go", lambda d: row(d, vm_id) is None)
    wait(browser, "the loaded VM's row", lambda d: row(d, new_id))


def test_with_auth_on_the_page_asks_for_a_token_then_works(short_tmp: Path) -> None:
    """The page loads without a token, prompts at the first 401, and works once given one."""
    workdir = short_tmp / "auth"
    prepare_images(workdir)
    proc = start_daemon(workdir, extra_config=f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n')
    try:
        with chromium() as driver:
            driver.get(proc.base_url + "/")
            wait(driver, "the token prompt", lambda d: visible(d, "#token-form [name=token]"))
            find(driver, "#token-form [name=token]").send_keys(TOKEN + "\n")
            wait(driver, "the version", lambda d: find(d, "#version").text.startswith("v"))
            wait(driver, "the event stream", lambda d: find(d, "#live").text == "live")
            assert driver.execute_script("return localStorage.getItem('vmm.token')") == TOKEN
            assert all(TOKEN not in url for url in requested_urls(driver))
    finally:
        proc.destroy()


def test_the_page_polls_while_the_stream_is_down_and_resumes_it(short_tmp: Path) -> None:
    """A daemon restart drops /events: the page polls meanwhile, then follows the new stream."""
    workdir = short_tmp / "restart"
    prepare_images(workdir)
    address = [f"tcp:127.0.0.1:{free_port()}"]
    proc = start_daemon(workdir, addresses=address, extra_config=idle_config())
    try:
        with chromium() as driver:
            driver.get(proc.base_url + "/")
            wait(driver, "the event stream", lambda d: find(d, "#live").text == "live")
            proc.kill()  # SIGKILL: the stream drops without an end
            wait(driver, "polling", lambda d: find(d, "#live").text == "polling")
            proc = start_daemon(workdir, addresses=address, extra_config=idle_config())
            with proc.client() as client:
                vm_id = create(client, name="after-restart", stopped=True)
            wait(driver, "the new daemon's VM", lambda d: row(d, vm_id))
            wait(driver, "the stream again", lambda d: find(d, "#live").text == "live")
            with proc.client() as client:
                later = create(client, name="while-live", stopped=True)
            wait(driver, "a VM seen through the resumed stream", lambda d: row(d, later))
    finally:
        proc.destroy()
