"""The kernel functions memhp-observer watches (DESIGN.md §2, kernel-reference.md §2)."""

CORE = ("arch_add_memory", "__remove_pages", "release_mem_region_adjustable",
        "devm_memremap_pages")

# Needed for a faithful model: non-devm ZONE_DEVICE users, the zone-span changes, online/offline,
# and the outer add/remove calls that say which driver asked.
COMPANIONS = ("memremap_pages", "memunmap_pages", "move_pfn_range_to_zone",
              "remove_pfn_range_from_zone", "online_pages", "offline_pages",
              "add_memory_resource", "try_remove_memory", "arch_remove_memory")

# Resource claims that show a conflict (a hot-add refused) or where a device-private region lands.
RESOURCES = ("register_memory_resource", "request_free_mem_region")

ALL = CORE + COMPANIONS + RESOURCES
