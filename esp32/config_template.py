# config.py for an ESP32 compute node. Copy to config.py (scripts/deploy_esp32.py writes
# it from its arguments) and keep it off version control: it holds passwords.

# Wi-Fi
WIFI_SSID = "my-network"
WIFI_PASSWORD = "my-password"
WIFI_TIMEOUT_S = 15        # one connection attempt; main.py retries with backoff
BOOT_WIFI_WAIT_S = 3       # how long boot.py waits (kept short so the REPL stays usable)
HOSTNAME = None            # e.g. "fabric-node-1"

# Static IP (leave STATIC_IP None for DHCP); gateway and DNS default to <net>.1
STATIC_IP = None           # e.g. "192.168.1.50"
NETMASK = "255.255.255.0"
GATEWAY = None
DNS = None

# MQTT broker
MQTT_HOST = "192.168.1.10"
MQTT_PORT = 1883
MQTT_USER = None
MQTT_PASSWORD = None
MQTT_KEEPALIVE = 30        # seconds; the node pings at half this, the broker drops it at 1.5x
IO_TIMEOUT_S = 10          # longest wait on the socket before reconnecting
MQTT_CA_FILE = None        # e.g. "ca.der": TLS to the broker, its certificate verified against
                           # this CA (PEM or DER, on the board); MQTT_PORT is then its TLS port
MQTT_TLS_HOSTNAME = None   # the name the broker's certificate is for (default: MQTT_HOST)

# Fabric
TOPIC_ROOT = "fabric"
NODE_ID = None             # None: "esp32-<mac hex>"
HEARTBEAT_S = 5            # retained status republished this often
MAX_PAYLOAD = 8192         # longest task message accepted, bytes (advertised in the status);
                           # a buffer this size is reserved at start. A decoded task takes
                           # 2-4x its JSON size in heap: raise only on boards with PSRAM
PREFETCH = 0               # tasks the master may send beyond the one running: each may be
                           # MAX_PAYLOAD long, so the heap must hold (1 + PREFETCH) of them
QUEUE_SIZE = 8             # tasks held on the board; the least urgent is handed back past this
QUEUE_BYTES = None         # ... or past this much held task JSON (one task always fits);
                           # None: (1 + PREFETCH) * MAX_PAYLOAD, what the master may send

# Reconnection backoff, seconds (doubles from MIN to MAX, with jitter)
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30

# Clock: result timestamps are unix time; set an NTP server on boards without a set RTC
NTP_HOST = None            # e.g. "pool.ntp.org"
