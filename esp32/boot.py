# boot.py: runs at every reset, before main.py. Starts Wi-Fi from config.py and returns
# quickly (a tool waiting on the REPL after a soft reset must not time out); main.py
# keeps the link up from then on.
import gc

try:
    import config
    import wifi
    wifi.up(config, getattr(config, "BOOT_WIFI_WAIT_S", 3))
except Exception as e:
    print("boot:", repr(e))
gc.collect()
