"""The kernel functions memhp-observer watches (DESIGN.md §2, kernel-reference.md §2)."""

CORE = ("arch_add_memory", "__remove_pages", "release_mem_region_adjustable",
        "devm_memremap_pages")

# Needed for a faithful model: non-devm ZONE_DEVICE users, the zone-span changes, online/offline,
# and the outer add/remove calls that say which driver asked.
COMPANIONS = ("memremap_pages", "memunmap_pages", "move_pfn_range_to_zone",
              "remove_pfn_range_from_zone", "online_pages", "offline_pages",
              "add_memory_resource", "try_remove_memory", "arch_remove_memory")

# The device-private path as GPU drivers take it: devm_request_free_mem_region calls the static
# __request_free_mem_region (not request_free_mem_region), and memremap_pages adds the pages
# through add_pages, not arch_add_memory (kernel-reference.md §2.4).
DEVICE_PRIVATE = ("add_pages", "request_free_mem_region", "devm_request_free_mem_region",
                  "__request_free_mem_region")

# Resource claims that show a conflict: a hot-add refused (register_memory_resource returns
# -EEXIST), any region request that failed (__request_region, failures only).
RESOURCES = ("register_memory_resource", "__request_region")

# Calls that annotate a watched call in flight on the same thread instead of being calls of their
# own (an entry probe, no number in the call order). An offline refused because a page would not
# isolate or migrate names that page only through dump_page(page, reason): "unmovable page" from
# set_migratetype_isolate, "migration failure" from do_migrate_range (kernel-reference.md §5).
ANNOTATIONS = {"dump_page": "offline_pages"}

ALL = CORE + COMPANIONS + DEVICE_PRIVATE + RESOURCES + tuple(ANNOTATIONS)
